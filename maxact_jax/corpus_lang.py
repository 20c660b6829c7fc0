"""Multilingual sentences for the built-in corpus, from templates written here.

Each language has the same eight sentence templates (where its grammar allows
them without case or agreement tables) and word lists aligned by index: city
`k` is the same city in every language, weekday `k` the same day. So a unit
is either a paragraph in one language or a parallel "phrasebook" entry, the
same sentence in several languages. Numbers stay in ranges where every
language's plural form is the one written (5..10 years, hours 5..12).
"""

from __future__ import annotations

import random
from typing import Iterator

# Per language: names, cities (aligned), weekdays (aligned, with the preposition
# the language needs), weather words, fruit plurals (aligned) and templates.
LANGUAGES: dict[str, dict[str, object]] = {
    'en': dict(
        names=('Emma', 'Oliver', 'Grace', 'Henry', 'Alice', 'Samuel'),
        cities=('Vienna', 'Munich', 'Rome', 'Lisbon', 'Moscow', 'Athens', 'Istanbul', 'Beijing', 'Tokyo',
                'Seoul', 'Delhi', 'Paris', 'London', 'Madrid', 'Warsaw', 'Prague'),
        weekdays=('On Monday', 'On Tuesday', 'On Wednesday', 'On Thursday', 'On Friday', 'On Saturday',
                  'On Sunday'),
        weather=('sunny', 'cold', 'warm', 'windy', 'rainy'),
        fruits=('apples', 'pears', 'oranges', 'lemons', 'plums'),
        templates=dict(
            live='{name} has lived in {city} for {n} years.',
            train="The train to {city} leaves at {h} o'clock.",
            weather='Today the weather in {city} is {weather}.',
            market='{weekday}, {name} buys bread at the market.',
            read='{name} reads a book in the library every evening.',
            meet="{name} and {name2} meet in front of the museum at {h} o'clock.",
            count='There are {n} {fruit} on the table.',
            ask='Excuse me, how do I get to the station in {city}?')),
    'de': dict(
        names=('Anna', 'Lukas', 'Marie', 'Felix', 'Lena', 'Jonas'),
        cities=('Wien', 'München', 'Rom', 'Lissabon', 'Moskau', 'Athen', 'Istanbul', 'Peking', 'Tokio',
                'Seoul', 'Delhi', 'Paris', 'London', 'Madrid', 'Warschau', 'Prag'),
        weekdays=('Am Montag', 'Am Dienstag', 'Am Mittwoch', 'Am Donnerstag', 'Am Freitag', 'Am Samstag',
                  'Am Sonntag'),
        weather=('sonnig', 'kalt', 'warm', 'windig', 'regnerisch'),
        fruits=('Äpfel', 'Birnen', 'Orangen', 'Zitronen', 'Pflaumen'),
        templates=dict(
            live='{name} wohnt seit {n} Jahren in {city}.',
            train='Der Zug nach {city} fährt um {h} Uhr ab.',
            weather='Heute ist das Wetter in {city} {weather}.',
            market='{weekday} kauft {name} Brot auf dem Markt.',
            read='{name} liest jeden Abend ein Buch in der Bibliothek.',
            meet='{name} und {name2} treffen sich um {h} Uhr vor dem Museum.',
            count='Auf dem Tisch liegen {n} {fruit}.',
            ask='Entschuldigung, wie komme ich zum Bahnhof in {city}?')),
    'fr': dict(
        names=('Camille', 'Louis', 'Chloé', 'Hugo', 'Léa', 'Antoine'),
        cities=('Vienne', 'Munich', 'Rome', 'Lisbonne', 'Moscou', 'Athènes', 'Istanbul', 'Pékin', 'Tokyo',
                'Séoul', 'Delhi', 'Paris', 'Londres', 'Madrid', 'Varsovie', 'Prague'),
        weekdays=('Le lundi', 'Le mardi', 'Le mercredi', 'Le jeudi', 'Le vendredi', 'Le samedi', 'Le dimanche'),
        weather=('beau', 'froid', 'chaud', 'doux', 'gris'),
        fruits=('pommes', 'poires', 'oranges', 'citrons', 'prunes'),
        templates=dict(
            live='{name} habite à {city} depuis {n} ans.',
            train='Le train pour {city} part à {h} heures.',
            weather="Aujourd'hui, il fait {weather} à {city}.",
            market='{weekday}, {name} achète du pain au marché.',
            read='{name} lit un livre à la bibliothèque chaque soir.',
            meet='{name} et {name2} se retrouvent à {h} heures devant le musée.',
            count='Il y a {n} {fruit} sur la table.',
            ask='Excusez-moi, comment aller à la gare de {city} ?')),
    'es': dict(
        names=('Lucía', 'Carlos', 'Marta', 'Javier', 'Elena', 'Pablo'),
        cities=('Viena', 'Múnich', 'Roma', 'Lisboa', 'Moscú', 'Atenas', 'Estambul', 'Pekín', 'Tokio', 'Seúl',
                'Delhi', 'París', 'Londres', 'Madrid', 'Varsovia', 'Praga'),
        weekdays=('Los lunes', 'Los martes', 'Los miércoles', 'Los jueves', 'Los viernes', 'Los sábados',
                  'Los domingos'),
        weather=('sol', 'frío', 'calor', 'viento', 'buen tiempo'),
        fruits=('manzanas', 'peras', 'naranjas', 'limones', 'ciruelas'),
        templates=dict(
            live='{name} vive en {city} desde hace {n} años.',
            train='El tren a {city} sale a las {h}.',
            weather='Hoy hace {weather} en {city}.',
            market='{weekday}, {name} compra pan en el mercado.',
            read='{name} lee un libro en la biblioteca todas las noches.',
            meet='{name} y {name2} quedan a las {h} delante del museo.',
            count='Hay {n} {fruit} en la mesa.',
            ask='Perdone, ¿cómo llego a la estación de {city}?')),
    'it': dict(
        names=('Giulia', 'Marco', 'Sara', 'Luca', 'Chiara', 'Matteo'),
        cities=('Vienna', 'Monaco di Baviera', 'Roma', 'Lisbona', 'Mosca', 'Atene', 'Istanbul', 'Pechino',
                'Tokyo', 'Seul', 'Delhi', 'Parigi', 'Londra', 'Madrid', 'Varsavia', 'Praga'),
        weekdays=('Il lunedì', 'Il martedì', 'Il mercoledì', 'Il giovedì', 'Il venerdì', 'Il sabato',
                  'La domenica'),
        weather=('bel tempo', 'freddo', 'caldo', 'fresco', 'brutto tempo'),
        fruits=('mele', 'pere', 'arance', 'limoni', 'prugne'),
        templates=dict(
            live='{name} abita a {city} da {n} anni.',
            train='Il treno per {city} parte alle {h}.',
            weather='Oggi a {city} fa {weather}.',
            market='{weekday} {name} compra il pane al mercato.',
            read='{name} legge un libro in biblioteca ogni sera.',
            meet='{name} e {name2} si incontrano alle {h} davanti al museo.',
            count='Sul tavolo ci sono {n} {fruit}.',
            ask='Scusi, come arrivo alla stazione di {city}?')),
    'pt': dict(
        names=('Ana', 'João', 'Beatriz', 'Pedro', 'Inês', 'Tiago'),
        cities=('Viena', 'Munique', 'Roma', 'Lisboa', 'Moscou', 'Atenas', 'Istambul', 'Pequim', 'Tóquio',
                'Seul', 'Délhi', 'Paris', 'Londres', 'Madrid', 'Varsóvia', 'Praga'),
        weekdays=('Na segunda-feira', 'Na terça-feira', 'Na quarta-feira', 'Na quinta-feira', 'Na sexta-feira',
                  'No sábado', 'No domingo'),
        weather=('ensolarado', 'frio', 'quente', 'ventoso', 'chuvoso'),
        fruits=('maçãs', 'peras', 'laranjas', 'limões', 'ameixas'),
        templates=dict(
            live='{name} mora em {city} há {n} anos.',
            train='O trem para {city} parte às {h} horas.',
            weather='Hoje o tempo em {city} está {weather}.',
            market='{weekday}, {name} compra pão no mercado.',
            read='{name} lê um livro na biblioteca todas as noites.',
            meet='{name} e {name2} encontram-se às {h} horas em frente ao museu.',
            count='Há {n} {fruit} na mesa.',
            ask='Com licença, como chego à estação de {city}?')),
    'nl': dict(
        names=('Sanne', 'Daan', 'Emma', 'Bram', 'Lotte', 'Sem'),
        cities=('Wenen', 'München', 'Rome', 'Lissabon', 'Moskou', 'Athene', 'Istanboel', 'Peking', 'Tokio',
                'Seoel', 'Delhi', 'Parijs', 'Londen', 'Madrid', 'Warschau', 'Praag'),
        weekdays=('Op maandag', 'Op dinsdag', 'Op woensdag', 'Op donderdag', 'Op vrijdag', 'Op zaterdag',
                  'Op zondag'),
        weather=('zonnig', 'koud', 'warm', 'winderig', 'regenachtig'),
        fruits=('appels', 'peren', 'sinaasappels', 'citroenen', 'pruimen'),
        templates=dict(
            live='{name} woont al {n} jaar in {city}.',
            train='De trein naar {city} vertrekt om {h} uur.',
            weather='Vandaag is het weer in {city} {weather}.',
            market='{weekday} koopt {name} brood op de markt.',
            read='{name} leest elke avond een boek in de bibliotheek.',
            meet='{name} en {name2} spreken om {h} uur af voor het museum.',
            count='Er liggen {n} {fruit} op de tafel.',
            ask='Pardon, hoe kom ik bij het station van {city}?')),
    'ru': dict(
        names=('Анна', 'Иван', 'Ольга', 'Сергей', 'Мария', 'Дмитрий'),
        cities=('Вена', 'Мюнхен', 'Рим', 'Лиссабон', 'Москва', 'Афины', 'Стамбул', 'Пекин', 'Токио', 'Сеул',
                'Дели', 'Париж', 'Лондон', 'Мадрид', 'Варшава', 'Прага'),
        weekdays=('В понедельник', 'Во вторник', 'В среду', 'В четверг', 'В пятницу', 'В субботу',
                  'В воскресенье'),
        weather=('солнечно', 'холодно', 'тепло', 'ветрено', 'дождливо'),
        fruits=('яблок', 'груш', 'апельсинов', 'лимонов', 'слив'),  # genitive plural, for 5..10
        templates=dict(
            live='{name} живёт в городе {city} уже {n} лет.',
            train='Поезд в город {city} отправляется в {h} часов.',
            weather='Сегодня в городе {city} {weather}.',
            market='{weekday} {name} покупает хлеб на рынке.',
            read='{name} каждый вечер читает книгу в библиотеке.',
            meet='{name} и {name2} встречаются в {h} часов у музея.',
            count='На столе лежит {n} {fruit}.',
            ask='Извините, как пройти к вокзалу? Мне нужно в город {city}.')),
    'el': dict(
        names=('ο Νίκος', 'η Μαρία', 'ο Γιώργος', 'η Ελένη', 'ο Κώστας', 'η Σοφία'),
        cities=('Βιέννη', 'Μόναχο', 'Ρώμη', 'Λισαβόνα', 'Μόσχα', 'Αθήνα', 'Κωνσταντινούπολη', 'Πεκίνο',
                'Τόκιο', 'Σεούλ', 'Δελχί', 'Παρίσι', 'Λονδίνο', 'Μαδρίτη', 'Βαρσοβία', 'Πράγα'),
        weekdays=('Τη Δευτέρα', 'Την Τρίτη', 'Την Τετάρτη', 'Την Πέμπτη', 'Την Παρασκευή', 'Το Σάββατο',
                  'Την Κυριακή'),
        weather=('ηλιόλουστος', 'κρύος', 'ζεστός', 'ήπιος', 'βροχερός'),
        fruits=('μήλα', 'αχλάδια', 'πορτοκάλια', 'λεμόνια', 'δαμάσκηνα'),
        templates=dict(
            live='{name} μένει στην πόλη {city} εδώ και {n} χρόνια.',
            train='Το τρένο για {city} αναχωρεί στις {h}.',
            weather='Σήμερα ο καιρός στην πόλη {city} είναι {weather}.',
            market='{weekday} {name} αγοράζει ψωμί από την αγορά.',
            read='{name} διαβάζει ένα βιβλίο στη βιβλιοθήκη κάθε βράδυ.',
            meet='{name} και {name2} συναντιούνται στις {h} μπροστά στο μουσείο.',
            count='Πάνω στο τραπέζι υπάρχουν {n} {fruit}.',
            ask='Συγγνώμη, πώς πάω στον σταθμό; Πηγαίνω στην πόλη {city}.')),
    'tr': dict(
        names=('Ayşe', 'Mehmet', 'Elif', 'Emre', 'Zeynep', 'Can'),
        cities=('Viyana', 'Münih', 'Roma', 'Lizbon', 'Moskova', 'Atina', 'İstanbul', 'Pekin', 'Tokyo', 'Seul',
                'Delhi', 'Paris', 'Londra', 'Madrid', 'Varşova', 'Prag'),
        weekdays=('Pazartesi günü', 'Salı günü', 'Çarşamba günü', 'Perşembe günü', 'Cuma günü',
                  'Cumartesi günü', 'Pazar günü'),
        weather=('güneşli', 'soğuk', 'sıcak', 'rüzgârlı', 'yağmurlu'),
        fruits=('elma', 'armut', 'portakal', 'limon', 'erik'),  # singular after a numeral
        templates=dict(
            live='{name} {n} yıldır {city} şehrinde yaşıyor.',
            train='{city} treni saat {h}{hsuf} kalkıyor.',
            weather='Bugün {city} şehrinde hava {weather}.',
            market='{weekday} {name} pazardan ekmek alıyor.',
            read='{name} her akşam kütüphanede kitap okuyor.',
            meet='{name} ve {name2} saat {h}{hsuf} müzenin önünde buluşuyor.',
            count='Masada {n} {fruit} var.',
            ask='Affedersiniz, {city} garına nasıl gidebilirim?')),
    'zh': dict(
        names=('王芳', '李伟', '张敏', '刘洋', '陈静', '杨磊'),
        cities=('维也纳', '慕尼黑', '罗马', '里斯本', '莫斯科', '雅典', '伊斯坦布尔', '北京', '东京', '首尔', '德里', '巴黎',
                '伦敦', '马德里', '华沙', '布拉格'),
        weekdays=('星期一', '星期二', '星期三', '星期四', '星期五', '星期六', '星期日'),
        weather=('好', '冷', '热', '暖和', '糟糕'),
        fruits=('苹果', '梨', '橙子', '柠檬', '李子'),
        templates=dict(
            live='{name}在{city}住了{n}年了。',
            train='开往{city}的火车{h}点出发。',
            weather='今天{city}的天气很{weather}。',
            market='{weekday}{name}去市场买面包。',
            read='{name}每天晚上在图书馆看书。',
            meet='{name}和{name2}{h}点在博物馆门口见面。',
            count='桌子上有{n}个{fruit}。',
            ask='请问，去{city}火车站怎么走？')),
    'ja': dict(
        names=('佐藤', '鈴木', '高橋', '田中', '渡辺', '伊藤'),
        cities=('ウィーン', 'ミュンヘン', 'ローマ', 'リスボン', 'モスクワ', 'アテネ', 'イスタンブール', '北京', '東京', 'ソウル',
                'デリー', 'パリ', 'ロンドン', 'マドリード', 'ワルシャワ', 'プラハ'),
        weekdays=('月曜日に', '火曜日に', '水曜日に', '木曜日に', '金曜日に', '土曜日に', '日曜日に'),
        weather=('晴れ', '寒い', '暖かい', '曇り', '雨'),
        fruits=('りんご', '梨', 'オレンジ', 'レモン', 'すもも'),
        templates=dict(
            live='{name}さんは{n}年前から{city}に住んでいます。',
            train='{city}行きの電車は{h}時に出発します。',
            weather='今日の{city}の天気は{weather}です。',
            market='{weekday}、{name}さんは市場でパンを買います。',
            read='{name}さんは毎晩図書館で本を読みます。',
            meet='{name}さんと{name2}さんは{h}時に博物館の前で会います。',
            count='テーブルの上に{fruit}が{n}個あります。',
            ask='すみません、{city}の駅へはどう行けばいいですか。')),
    'ko': dict(
        names=('민준', '서연', '지훈', '하은', '도윤', '수빈'),
        cities=('빈', '뮌헨', '로마', '리스본', '모스크바', '아테네', '이스탄불', '베이징', '도쿄', '서울', '델리', '파리', '런던',
                '마드리드', '바르샤바', '프라하'),
        weekdays=('월요일에', '화요일에', '수요일에', '목요일에', '금요일에', '토요일에', '일요일에'),
        weather=('맑습니다', '춥습니다', '따뜻합니다', '흐립니다', '덥습니다'),
        fruits=('사과가', '배가', '오렌지가', '레몬이', '자두가'),  # with the subject particle each needs
        templates=dict(
            live='{name} 씨는 {n}년 동안 {city}에서 살았습니다.',
            train='{city}행 기차는 {h}시에 출발합니다.',
            weather='오늘 {city}의 날씨는 {weather}.',
            market='{weekday} {name} 씨는 시장에서 빵을 삽니다.',
            read='{name} 씨는 매일 저녁 도서관에서 책을 읽습니다.',
            meet='{name} 씨와 {name2} 씨는 {h}시에 박물관 앞에서 만납니다.',
            count='탁자 위에 {fruit} {n}개 있습니다.',
            ask='실례합니다, {city} 역에 어떻게 가요?')),
    'ar': dict(
        names=('محمد', 'عمر', 'يوسف', 'خالد', 'سامي', 'كريم'),  # the verbs below are masculine
        cities=('فيينا', 'ميونخ', 'روما', 'لشبونة', 'موسكو', 'أثينا', 'إسطنبول', 'بكين', 'طوكيو', 'سيول', 'دلهي',
                'باريس', 'لندن', 'مدريد', 'وارسو', 'براغ'),
        weekdays=('يوم الاثنين', 'يوم الثلاثاء', 'يوم الأربعاء', 'يوم الخميس', 'يوم الجمعة', 'يوم السبت',
                  'يوم الأحد'),
        weather=('مشمس', 'بارد', 'دافئ', 'عاصف', 'ممطر'),
        fruits=(),
        templates=dict(
            live='يعيش {name} في {city} منذ {n} سنوات.',
            train='يغادر القطار المتجه إلى {city} في الساعة {h}.',
            weather='الطقس اليوم في {city} {weather}.',
            market='{weekday} يشتري {name} الخبز من السوق.',
            read='يقرأ {name} كتابًا في المكتبة كل مساء.',
            meet='يلتقي {name} و{name2} في الساعة {h} أمام المتحف.',
            ask='عفوًا، كيف أصل إلى محطة القطار في {city}؟')),
    'hi': dict(
        names=('राहुल', 'प्रिया', 'अमित', 'नेहा', 'विकास', 'अंजलि'),
        cities=('वियना', 'म्यूनिख', 'रोम', 'लिस्बन', 'मॉस्को', 'एथेंस', 'इस्तांबुल', 'बीजिंग', 'टोक्यो', 'सियोल',
                'दिल्ली', 'पेरिस', 'लंदन', 'मैड्रिड', 'वारसॉ', 'प्राग'),
        weekdays=('सोमवार को', 'मंगलवार को', 'बुधवार को', 'गुरुवार को', 'शुक्रवार को', 'शनिवार को', 'रविवार को'),
        weather=('अच्छा', 'ठंडा', 'गर्म', 'सुहावना', 'खराब'),
        fruits=('सेब', 'नाशपाती', 'संतरे', 'नींबू', 'आलूबुखारे'),
        templates=dict(
            live='{name} {n} साल से {city} में रहते हैं।',
            train='{city} जाने वाली ट्रेन {h} बजे निकलती है।',
            weather='आज {city} में मौसम {weather} है।',
            market='{weekday} {name} बाज़ार से रोटी खरीदते हैं।',
            read='{name} हर शाम पुस्तकालय में एक किताब पढ़ते हैं।',
            meet='{name} और {name2} {h} बजे संग्रहालय के सामने मिलते हैं।',
            count='मेज़ पर {n} {fruit} हैं।',
            ask='माफ़ कीजिए, {city} का स्टेशन कैसे जाऊँ?')),
}
# Turkish writes the locative after an hour with the suffix the numeral's last vowel calls for.
TURKISH_HOUR_SUFFIX = {5: "'te", 6: "'da", 7: "'de", 8: "'de", 9: "'da", 10: "'da", 11: "'de", 12: "'de"}
NO_SPACE = ('zh', 'ja')  # sentences follow each other without a space


def _slots(rng: random.Random) -> dict[str, int]:
  """Language-independent choices: indices into the aligned lists, and numbers."""
  n1, n2 = rng.sample(range(6), 2)
  return dict(name=n1, name2=n2, city=rng.randrange(16), weekday=rng.randrange(7), weather=rng.randrange(5),
              fruit=rng.randrange(5), n=rng.randrange(5, 11), h=rng.randrange(5, 13))


def sentence(lang: str, key: str, s: dict[str, int]) -> str | None:
  """One template of one language filled from language-independent slots (None: no such template)."""
  spec = LANGUAGES[lang]
  template = spec['templates'].get(key)  # type: ignore[union-attr]
  if template is None:
    return None
  text = template.format(
      name=spec['names'][s['name']], name2=spec['names'][s['name2']], city=spec['cities'][s['city']],
      weekday=spec['weekdays'][s['weekday']], weather=spec['weather'][s['weather']],
      fruit=spec['fruits'][s['fruit']] if spec['fruits'] else '', n=s['n'], h=s['h'],
      hsuf=TURKISH_HOUR_SUFFIX[s['h']])
  return text[0].upper() + text[1:]


def multilingual(rng: random.Random) -> Iterator[str]:
  """A document in one language, or (one in four) a parallel phrasebook over several."""
  langs = sorted(LANGUAGES)
  keys = sorted(LANGUAGES['en']['templates'])  # type: ignore[arg-type]
  if rng.random() < 0.25:
    chosen = ['en'] + rng.sample([l for l in langs if l != 'en'], rng.randrange(2, 6))
    while True:
      s, key = _slots(rng), keys[rng.randrange(len(keys))]
      yield '\n'.join(f'{l}: {t}' for l in chosen if (t := sentence(l, key, s)))
  lang = langs[rng.randrange(len(langs))]
  sep = '' if lang in NO_SPACE else ' '
  while True:
    out = []
    for _ in range(rng.randrange(2, 7)):
      t = sentence(lang, keys[rng.randrange(len(keys))], _slots(rng))
      if t:
        out.append(t)
    yield sep.join(out)
